"""Cortex-M backend: self-contained C (:mod:`.emit_c`) on one static arena (:mod:`.arena`), built
and run under qemu-system-arm (:mod:`.build`) from the sources in ``templates/``."""
