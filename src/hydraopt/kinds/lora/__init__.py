"""LoRA adapters (PEFT ``peft_type: "LORA"``): config checks, load, bundle, export.

Modules: ``config`` (config checks and each module's scale), ``load`` (adapter dirs -> a lazy
``AdapterSet``), ``bundle`` (bundle files and PEFT export), ``kind`` (the
:class:`~hydraopt.kinds.base.AdapterKind` implementation). The merge methods' LoRA entry point is
``merge`` on each method (:mod:`hydraopt.merge`).
"""
