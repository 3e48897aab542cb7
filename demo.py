"""The whole cascade pipeline on Fashion-MNIST, on a CPU: `make demo`.

Steps, each one a command a user could type (they are printed before they run):
  1. write Fashion-MNIST in the CIFAR-10 binary format (prepare_fashion_mnist.py);
  2. train a CIFAR ResNet's backbone and final classifier (cifar10_main.py --classifier_id 2);
  3. fine-tune both early-exit heads on the frozen backbone (--fine_tune --classifier_id all);
  4. dump the softmax of all three exits for the training and test images (--eval_only);
  5. find per-exit confidence thresholds and cascade curves (analyze_imagenet_labels.py).

Everything lands in --output_dir (default demo_output/): data/, model/, softmax/, report/, logs/.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', 'demo_output', 'Folder for data, model, dumps and report.')
flags.DEFINE_integer('resnet_size', 8, 'CIFAR ResNet depth (6n+2).')
flags.DEFINE_integer('train_epochs', 5, 'Epochs to train the backbone and final classifier.')
flags.DEFINE_integer('head_epochs', 2, 'Epochs to fine-tune the two early-exit heads.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.')
flags.DEFINE_integer('train_limit', None, 'Use only the first N training images.')
flags.DEFINE_integer('test_limit', None, 'Use only the first N test images.')
flags.DEFINE_string('fashion_mnist_dir', None, 'Folder of the Fashion-MNIST idx files (default: '
                    'the Debian package dataset-fashion-mnist).')

HERE = os.path.dirname(os.path.abspath(__file__))


def run(step, argv, log_dir, show_output=False):
  """Runs one step as a subprocess with this interpreter, echoing the command.

  The step's log goes to <log_dir>/<script>.log (its last lines are shown if it fails); with
  ``show_output`` its standard output is printed as well.
  """
  command = [sys.executable, os.path.join(HERE, argv[0])] + argv[1:]
  print('\n== {} ==\n$ {}'.format(step, ' '.join(['python'] + argv)), flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, '{}.log'.format(step.split()[0].replace('/', '_of_')))
  start = time.time()
  with open(log_path, 'w') as log:
    result = subprocess.run(command, env=env, check=False, stderr=log,
                            stdout=None if show_output else log)
  if result.returncode:
    with open(log_path) as log:
      tail = log.readlines()[-15:]
    sys.exit('{}demo step "{}" failed (exit code {}); full log: {}'.format(
        ''.join(tail), step, result.returncode, log_path))
  print('   done in {:.0f} s (log: {})'.format(time.time() - start, log_path), flush=True)


def main(_):
  out = FLAGS.output_dir
  data_dir = os.path.join(out, 'data')
  backbone_dir = os.path.join(out, 'model', 'backbone')
  cascade_dir = os.path.join(out, 'model', 'cascade')
  softmax_dir = os.path.join(out, 'softmax')
  report_dir = os.path.join(out, 'report')
  log_dir = os.path.join(out, 'logs')
  start = time.time()

  prepare = ['prepare_fashion_mnist.py', '--output_dir', data_dir]
  if FLAGS.fashion_mnist_dir:
    prepare += ['--fashion_mnist_dir', FLAGS.fashion_mnist_dir]
  if FLAGS.train_limit:
    prepare += ['--train_limit', str(FLAGS.train_limit)]
  if FLAGS.test_limit:
    prepare += ['--test_limit', str(FLAGS.test_limit)]
  run('1/5 prepare Fashion-MNIST', prepare, log_dir)

  # A few thousand steps are too few for BN's official 0.997 moving-average decay to forget its
  # initial statistics; 0.9 converges within a few dozen steps.
  common = ['-dd', data_dir, '-rv', '2', '-rs', str(FLAGS.resnet_size),
            '-bs', str(FLAGS.batch_size), '--num_gpus', '0', '--batch_norm_decay', '0.9']
  # As on ImageNet: a trained plain network first, then heads on its frozen backbone, warm-
  # started from its checkpoint into a model folder of their own.
  run('2/5 train backbone + final classifier',
      ['cifar10_main.py', '-md', backbone_dir] + common +
      # One evaluation, at the end: the others would cost half a minute and change nothing.
      ['--classifier_id', '2', '-te', str(FLAGS.train_epochs), '-ebe', str(FLAGS.train_epochs),
       '--softmax_dir', ''], log_dir)
  run('3/5 fine-tune both exit heads, backbone frozen',
      ['cifar10_main.py', '-md', cascade_dir, '-pmcp', backbone_dir] + common +
      ['--classifier_id', 'all', '--fine_tune', '-te', str(FLAGS.head_epochs),
       '--softmax_dir', ''], log_dir)
  run('4/5 dump softmax of all exits (train + test)',
      ['cifar10_main.py', '-md', cascade_dir] + common +
      ['--classifier_id', 'all', '--eval_only', '--softmax_dir', softmax_dir], log_dir)
  run('5/5 thresholds and cascade curves',
      ['analyze_imagenet_labels.py', '--softmax_dir', softmax_dir, '--output_dir', report_dir],
      log_dir, show_output=True)
  print('\nDemo finished in {:.1f} min; figures, thresholds.json and cascade.csv are in {}'.format(
      (time.time() - start) / 60, report_dir))


if __name__ == '__main__':
  app.run(main)
