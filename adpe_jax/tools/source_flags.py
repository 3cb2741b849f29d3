"""The flags both tools read: the source (a `get_source` name and split) and the output.

absl flags are process-wide and each is defined once, so `check` and `prepare`, which name
their source the same way, share these definitions (both modules can be imported in one
process, e.g. by tests).
"""

from absl import flags

SOURCE = flags.DEFINE_string("source", None, "a get_source name, e.g. folder:/data/in")
SPLIT = flags.DEFINE_string("split", "train", "the source's split")
DATA_DIR = flags.DEFINE_string("data_dir", None, "the directory a relative source name is "
                               "taken under (the source's default location if unset)")
OUT = flags.DEFINE_string("out", "", "check: the list of bad files (path<TAB>reason; default: "
                          "stdout only); prepare (required): the directory to write")
flags.mark_flag_as_required("source")
