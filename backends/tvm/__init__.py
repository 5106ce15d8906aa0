"""TVM backend: lower an integer program to Relax (:mod:`.lower`, :mod:`.lower_x86` with the
hand-written x86 kernels of :mod:`.x86_kernels`), schedule it (:mod:`.tuning`), build and run
the library (:mod:`.build`, :mod:`.model_runner`, :mod:`.aarch64` under qemu), and measure
per-layer latency (:mod:`.layer_latency`). ``shipped/`` holds scripts that run beside a built
library and are never imported."""
