"""LoRA adapters (PEFT ``peft_type: "LORA"``): config checks, load, bundle, export.

Modules: ``config`` (config checks and each module's scale), ``load`` (adapter dirs -> a lazy
``AdapterSet``), ``bundle`` (bundle files, PEFT export and the typed ``load_lora_bundle``),
``apply`` (factors applied to a model in memory as PEFT LoRA layers), ``traits`` (torch-free name
and PEFT type), ``kind`` (the
:class:`~hydraopt.kinds.base.AdapterKind` implementation). The merge methods' LoRA entry point is
``merge`` on each method (:mod:`hydraopt.merge`).
"""
