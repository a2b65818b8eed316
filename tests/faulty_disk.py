"""Run a console script with safetensors' file writer made faulty, for tests of what a
failed or killed merge leaves behind.

    FAULT=enospc python tests/faulty_disk.py mergekit-yaml CONFIG OUT ...
    FAULT=block FAULT_READY=F FAULT_GO=G python tests/faulty_disk.py mergekit-yaml ...

``enospc``: the first file written gets 1 KiB, then ``OSError(ENOSPC)``, as on a full disk.
``block``: the first file written gets 1 KiB, then ``FAULT_READY`` is created and the
writer waits for ``FAULT_GO`` to exist before writing for real.
"""

import errno
import os
import sys
import time

import safetensors.torch

_real_save_file = safetensors.torch.save_file


def _faulty_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\0" * 1024)
    if os.environ["FAULT"] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    open(os.environ["FAULT_READY"], "w").close()
    while not os.path.exists(os.environ["FAULT_GO"]):
        time.sleep(0.05)
    return _real_save_file(tensors, filename, metadata=metadata)


safetensors.torch.save_file = _faulty_save_file
script, sys.argv = sys.argv[1], sys.argv[1:]
if script == "mergekit-yaml":
    from mergekit.scripts.run_yaml import main
else:
    from mergekit_corespace.cli import lora_main as main
main()
