"""How vmtrim talks to QEMU (QMP, guest agent) and to libvirt."""
