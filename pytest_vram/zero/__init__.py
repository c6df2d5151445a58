"""DeepSpeed ZeRO: the config a spec runs with (``config``, torch-free), the engine as a trainer
inside one rank (``engine``), DeepSpeed's accelerator and op build (``ops``), the ranks as
processes (``ranks``), and the layout the fake meter predicts without DeepSpeed
(``simulation``). Importing this package imports none of them."""
