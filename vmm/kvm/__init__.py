"""The KVM accelerator: /dev/kvm driven through ioctls.

Layers, bottom up:
  uapi.py     the kernel's structures, declared for cffi
  ioctls.py   every ioctl number, computed in one table
  fd.py       KvmSystem -> VmFd -> VcpuFd: objects that own their fds
  cpuid.py    the guest CPUID built from KVM_GET_SUPPORTED_CPUID
  accel.py    KvmAccelerator: the vmm.accel interface on top of them
"""
