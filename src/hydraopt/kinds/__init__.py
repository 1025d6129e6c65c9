"""Adapter kinds, one package per PEFT tuner (``lora/``, ``vera/``) behind one interface.

:mod:`hydraopt.kinds.base` defines the interface (:class:`~hydraopt.kinds.base.AdapterKind`),
:mod:`hydraopt.kinds.registry` lists the kinds, :mod:`hydraopt.kinds.names` their torch-free
traits (:class:`~hydraopt.kinds.traits.KindTraits`: what the CLI parser and bundle headers need). Each kind package holds its config checks and key
layout, its loader (adapter dirs -> a lazy adapter set), its bundle tensors and PEFT export, and
its ``kind`` module implementing the interface; code outside this package picks a kind by name
(``get_kind(aset.kind)``, ``get_kind(bundle.kind)``), never by ``isinstance``.
"""
