"""Tests of the flag files in configs/: each parses with its main's flags and sets what it says.

Every file is parsed with a fresh ``absl.flags.FlagValues`` holding imagenet_main's or
cifar10_main's flags, as ``python <main> --flagfile=configs/<file>`` would (from the repository
root: nested ``--flagfile=`` paths are read relative to the working directory). The article's
head fine-tuning must equal the README's step-4 command line, the demo's files what demo.py
passes, and each variant must differ from its base in the flags it names only. The learning-rate
schedules are evaluated at chosen epochs in a small graph; nothing trains.

    .venv/bin/python -m pytest tests/configs_test.py
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import tensorflow.compat.v1 as tf
from absl import flags

import cifar10_main
import imagenet_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, 'configs')
# The main each flag file is for; a new file must be added here (and so get tested).
MAINS = {
    'imagenet_heads_article.flags': 'imagenet',
    'imagenet_backbone_official.flags': 'imagenet',
    'modern_heads.flags': 'imagenet',
    'demo_backbone.flags': 'cifar',
    'demo_heads.flags': 'cifar',
}
IMAGENET_TRAIN = imagenet_main.NUM_IMAGES['train']


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
  monkeypatch.chdir(REPO)


def parse(main, *args):
  """A fresh FlagValues of ``main`` ('imagenet' or 'cifar') parsed from ``args``."""
  flag_values = flags.FlagValues()
  if main == 'imagenet':
    imagenet_main.define_imagenet_flags(flag_values)
  else:
    cifar10_main.define_cifar_flags(flag_values)
  flag_values([f'{main}_main.py'] + [str(a) for a in args])
  return flag_values


def config(name, *args):
  return parse(MAINS[name], f'--flagfile=configs/{name}', *args)


def values(flag_values):
  """Every flag's value by its long name."""
  return {name: flag_values[name].value for name in flag_values
          if flag_values[name].name == name}


def differing(first, second):
  a, b = values(first), values(second)
  return {name for name in a if a[name] != b[name]}


def learning_rates(main_module, flag_values, epochs, num_images):
  """The schedule of ``flag_values`` at each of ``epochs`` (fractions allowed)."""
  batches_per_epoch = num_images / flag_values.batch_size
  with tf.Graph().as_default():
    step = tf.placeholder(tf.int64, [])
    rate = main_module.learning_rate_fn(flag_values, flag_values.batch_size,
                                        num_train_images=num_images)(step)
    with tf.Session() as sess:
      return [sess.run(rate, {step: int(round(e * batches_per_epoch))}) for e in epochs]


def test_every_config_file_is_known_and_parses_with_its_main():
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, '*.flags')))
  assert names == sorted(MAINS)
  for name in names:
    config(name)


@pytest.mark.parametrize('name', sorted(MAINS))
def test_flag_lines_are_long_form_without_trailing_comments(name):
  # absl reads a line as one argument: '-rv 2' or '--te=20  # epochs' would not mean what it says.
  with open(os.path.join(CONFIG_DIR, name)) as f:
    lines = [line.rstrip('\n') for line in f]
  flag_lines = [line for line in lines if line.strip() and not line.startswith('#')]
  assert flag_lines
  for line in flag_lines:
    assert re.fullmatch(r'--[a-z_0-9]+(=\S*)?', line), f'{name}: {line!r}'


def readme_heads_all_command():
  """Step 4's line that fine-tunes both heads in one run (README, between the bold '4.' and '5.'
  headings of "Reproducing the ImageNet results"), as arguments."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  step4 = text[text.index('**4. '):text.index('**5. ')]
  lines = [line.strip() for line in step4.splitlines()
           if line.strip().startswith('python imagenet_main.py')]
  matches = [line for line in lines if '--fine_tune' in line and '--classifier_id all' in line]
  assert len(matches) == 1, matches
  return shlex.split(matches[0].replace('$IMAGENET_HOME', '/data/imagenet'))[2:]


def test_article_heads_config_equals_the_readme_step_4_command_line():
  readme = parse('imagenet', *readme_heads_all_command())
  # The file holds the recipe; the folders and the machine stay on the command line.
  alone = config('imagenet_heads_article.flags')
  defaults = parse('imagenet')
  for name in ('model_dir', 'data_dir', 'num_gpus'):
    assert alone[name].value == defaults[name].value
  with_folders = config('imagenet_heads_article.flags', '-md', readme.model_dir,
                        '--data_dir', readme.data_dir, '--num_gpus', readme.num_gpus)
  assert values(with_folders) == values(readme)


def test_article_heads_config_is_the_fine_tuning_schedule():
  flag_values = config('imagenet_heads_article.flags')
  assert flag_values.fine_tune and flag_values.classifier_id == 'all'
  assert (flag_values.train_epochs, flag_values.batch_size) == (20, 32)
  assert flag_values.moving_average_decay is None and flag_values.label_smoothing == 0
  initial = 0.01 * 32 / 256   # no warm-up; / 10 at epoch 10 (and 20, the end)
  rates = learning_rates(imagenet_main, flag_values, [0, 9.9, 10.1, 19.9], IMAGENET_TRAIN)
  assert rates == pytest.approx([initial, initial, initial / 10, initial / 10])


def test_official_backbone_config_is_imagenet_mains_full_training_default():
  flag_values = config('imagenet_backbone_official.flags')
  defaults = parse('imagenet')
  # As its comment says: only these differ from a bare command line, all but v2 in form only.
  assert differing(flag_values, defaults) == {'resnet_version', 'is_cascaded', 'warmup_epochs',
                                              'data_format'}
  assert flag_values.resnet_version == '2'
  assert not flag_values.is_cascaded and flag_values.classifier_id == '2'
  assert not flag_values.fine_tune and flag_values.train_epochs == 90
  epochs = [0, 2.5, 4.9, 5.1, 29.9, 30.1, 60.1, 80.1, 89.9]
  rates = learning_rates(imagenet_main, flag_values, epochs, IMAGENET_TRAIN)
  assert rates == pytest.approx(learning_rates(imagenet_main, defaults, epochs, IMAGENET_TRAIN))
  initial = 0.128 * 32 / 256
  assert rates[0] == 0 and rates[1] == pytest.approx(initial / 2, rel=1e-3)
  assert rates[3:] == pytest.approx([initial, initial, initial / 10, initial / 100,
                                     initial / 1000, initial / 1000])


def test_modern_heads_overrides_only_the_schedule_and_the_average():
  modern = config('modern_heads.flags')
  article = config('imagenet_heads_article.flags')
  assert differing(modern, article) == {'lr_schedule', 'warmup_epochs', 'moving_average_decay'}
  assert modern.lr_schedule == 'cosine' and modern.warmup_epochs == 1
  assert modern.moving_average_decay == 0.9999 and modern.label_smoothing == 0
  initial = 0.01 * 32 / 256
  rates = learning_rates(imagenet_main, modern, [0, 0.5, 1, 10.5, 20], IMAGENET_TRAIN)
  assert rates == pytest.approx([0, initial / 2, initial, initial / 2, 0], abs=1e-7)


def demo_commands():
  """The cifar10_main.py argument lists demo.py runs, without running them (demo's own flags
  live on the global FlagValues, hence a process of its own)."""
  script = (
      'import json, sys\n'
      'import demo\n'
      'commands = []\n'
      'demo.run = lambda step, argv, log_dir, show_output=False: commands.append(argv)\n'
      "demo.FLAGS(['demo.py'])\n"
      'demo.main(None)\n'
      "print('COMMANDS=' + json.dumps(commands))\n")
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
  line = next(x for x in result.stdout.splitlines() if x.startswith('COMMANDS='))
  return [argv for argv in json.loads(line[len('COMMANDS='):]) if argv[0] == 'cifar10_main.py']


def test_demo_configs_are_what_demo_passes():
  backbone, heads, _ = demo_commands()   # train, fine-tune, dump
  for name, argv in (('demo_backbone.flags', backbone), ('demo_heads.flags', heads)):
    demo = parse('cifar', *argv[1:])
    folders = ['-dd', demo.data_dir, '-md', demo.model_dir]
    if demo.pretrained_model_checkpoint_path:
      folders += ['-pmcp', demo.pretrained_model_checkpoint_path]
    assert values(config(name, *folders)) == values(demo), name


def test_demo_heads_overrides_few_values_of_the_backbone_step():
  heads, backbone = config('demo_heads.flags'), config('demo_backbone.flags')
  assert differing(heads, backbone) == {'classifier_id', 'fine_tune', 'train_epochs',
                                        'epochs_between_evals'}
  assert heads.batch_norm_decay == 0.9 and heads.resnet_size == '8' and heads.softmax_dir == ''
