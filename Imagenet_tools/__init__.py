"""Tools that turn the ILSVRC2012 downloads into the TFRecords ``imagenet_main.py`` reads."""
