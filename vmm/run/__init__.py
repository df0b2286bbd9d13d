"""`pyvmm run`: one command in a fresh kernel, with the host's files, its output and its exit status.

    runner.py        the command line's options -> a machine -> the exit status
    modules.py       the kernel, its release, and the modules the guest must load
    initramfs.py     the run's initramfs: modules and /init
    init_program.py  /init, a static x86-64 program emitted by pyvmm
    stdio_share.py   stdin, stdout, stderr and the status as files of a virtio-fs share
"""
