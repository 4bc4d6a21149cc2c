"""Every input (libvirt XML, QEMU command lines, QMP, live libvirt) read into the model."""
