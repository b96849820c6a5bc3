# bigipc._core: the compiled core. One framed byte stream on one file
# descriptor; the same interface as bigipc/_purecore.py, written down in
# bigipc/_core.pyi. Compiler directives are set in setup.py only.
#
# The module is assembled from parts:
#   posix.pxi     declarations of the POSIX calls we make
#   deadline.pxi  monotonic deadlines, waiting on a descriptor, thread locks
#   channel.pxi   the Channel type: framing, sends, receives
#   queue.pxi     QueueEnds: the per-item fast paths of bigipc.Queue
#   floor.pxi     the benchmark's floor: plain C read/write loops

include "posix.pxi"
include "deadline.pxi"
include "channel.pxi"
include "queue.pxi"
include "floor.pxi"
