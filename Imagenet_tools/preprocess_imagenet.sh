#!/usr/bin/env bash
# Converts the ILSVRC2012 downloads in $IMAGENET_HOME (ILSVRC2012_img_train.tar,
# ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz) into TFRecords under
# $IMAGENET_HOME/tf_records. Extra arguments go to imagenet_to_tfrecords.py, e.g.
#   bash Imagenet_tools/preprocess_imagenet.sh --num_workers=8 --bbox_archive=$IMAGENET_HOME/ILSVRC2012_bbox_train_v2.tar.gz
set -euo pipefail
: "${IMAGENET_HOME:?is not set: export IMAGENET_HOME=/path/to/folder/with/the/ILSVRC2012/tarballs}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../.venv/bin/python"; [ -x "$python" ] || python=python3
exec "$python" "$here/imagenet_to_tfrecords.py" --imagenet_home="$IMAGENET_HOME" "$@"
