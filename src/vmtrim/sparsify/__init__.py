"""Give shut-off images their space back: ``sparsify`` in place through the lab guest,
and ``compact`` (a ``qemu-img convert`` rewrite); both refuse an image in use."""
