"""Read qcow2 and raw allocation without QEMU."""
