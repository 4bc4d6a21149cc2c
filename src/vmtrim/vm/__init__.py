"""Throwaway guests under QEMU or libvirt."""
