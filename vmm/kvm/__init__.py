"""The KVM accelerator: /dev/kvm driven through ioctls.

Layers, bottom up:
  uapi.py     the kernel's structures, declared for cffi
  ioctls.py   every ioctl number, computed in one table
  fd.py       KvmSystem -> VmFd -> VcpuFd: objects that own their fds
  cpuid.py    the guest CPUID built from KVM_GET_SUPPORTED_CPUID
  irq.py      the in-kernel irqchip: PC GSI routing, the 8259s' start-up mask, irq lines
  firmware_state.py   FPU, MSRs and LAPIC LINT pins as a PC's firmware leaves them
  vcpu.py     KvmVcpu: KVM_RUN and the kvm_run page turned into exit values
  exit_loop.py, exit_loop.c, exit_loop_build.py
              the compiled exit loop, where built: port and MMIO exits handled in C
  accel.py    KvmAccelerator and KvmVm: the vmm.accel interface on top of them
  quirks.py   what particular hosts' KVM cannot do; check.py: `pyvmm check`
"""
