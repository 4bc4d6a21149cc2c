"""Rewrite libvirt XML and QEMU command lines so discard passes."""
