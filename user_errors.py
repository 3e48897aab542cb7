"""Errors the user can fix: each ends a run in one 'error:' line that names the problem and the fix.

Bad flags, missing or damaged files, checkpoints that do not fit, and full, read-only or forbidden
output folders. The traceback goes to the debug log only (``--verbosity=1`` shows it).
"""

import errno
import os
import sys
import tempfile

import tensorflow.compat.v1 as tf
from absl import logging


def exit_on_user_error(job, flags_obj):
  """The mains' entry: runs ``job(flags_obj)``; a bad flag, file or checkpoint ends in one 'error:'
  line, and TensorFlow's log lines are printed once, by absl's handler.

  Such errors are the user's to fix and their messages say how, so the traceback only goes to
  the debug log (``--verbosity=1`` shows it).
  """
  # TensorFlow gave its logger a handler of its own before absl put one on the root logger, so
  # each of its lines came out twice; absl's handler alone prints them, in absl's format.
  tf_logger = tf.get_logger()
  for handler in list(tf_logger.handlers):
    tf_logger.removeHandler(handler)
  try:
    return job(flags_obj)
  except (ValueError, FileNotFoundError) as e:
    logging.debug('traceback of the error below', exc_info=True)
    sys.exit('error: {}'.format(e))
  except (OSError, tf.errors.OpError) as e:
    message = file_system_error(e)
    if message is None:
      raise
    logging.debug('traceback of the error below', exc_info=True)
    sys.exit('error: {}'.format(message))


# What a full, read-only or forbidden folder looks like, from Python and from TensorFlow's
# file writers (whose errors carry the C library's message, not an errno).
_FILE_SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_FILE_SYSTEM_MESSAGES = tuple(os.strerror(n) for n in _FILE_SYSTEM_ERRNOS)


def file_system_error(error):
  """One line for an error of a full, read-only or forbidden folder; None for other errors."""
  if isinstance(error, OSError) and error.errno in _FILE_SYSTEM_ERRNOS:
    where = error.filename or 'a file'
    return (f'cannot write {where}: {error.strerror}; free some space or choose a folder you '
            'can write to (--model_dir, --softmax_dir, --export_dir), then run the same command '
            'again (training resumes from the last checkpoint, dumps from their last commit)')
  if isinstance(error, tf.errors.OpError):
    text = error.message.splitlines()[0] if error.message else ''
    if any(m in text for m in _FILE_SYSTEM_MESSAGES):
      return (f'{text}; free some space or choose a folder you can write to (--model_dir, '
              '--softmax_dir, --export_dir), then run the same command again')
  return None


def check_writable(path, flag):
  """Raises one clear error if ``path`` (or, before it exists, its nearest existing parent) is
  on a read-only file system or not writable; creates nothing that stays."""
  folder = os.path.abspath(path)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    if os.path.exists(folder):
      raise ValueError(f'{flag} {path}: {folder} is a file, not a folder; choose a folder')
    folder = os.path.dirname(folder)
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-check-'):
      pass
  except OSError as e:
    raise ValueError(f'{flag} {path}: cannot write into {folder} ({e.strerror}); choose a '
                     'folder you can write to') from None
