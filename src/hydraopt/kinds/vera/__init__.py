"""VeRA adapters (PEFT ``peft_type: "VERA"``): load, merge through the one registry, bundle, export.

VeRA's update is ΔW = diag(λb) B diag(λd) A with frozen random projections A, B shared by every
module and task, so only the vectors λb (d) and λd (r) differ between tasks. Merging keeps one of
the two vectors shared and routes M rows of the other (HydraOpt), or merges both (TA/TIES/DARE).

Modules: ``projections`` (PEFT-exact regeneration of A and B), ``shapes`` (each module's input
features), ``load`` (adapter dirs -> a lazy ``VeraAdapterSet``; the io edge), ``config`` (the
typed HydraOpt-on-VeRA config), ``solve`` (pure tensor closed form and routing), ``merge``
(HydraOpt's ``merge_vera``: closed form + refinement), ``bundle`` (bundle files and PEFT export),
``analysis`` (λd / λb similarity across tasks), ``apply`` (VeRA weights applied to a model in
memory), ``traits`` (torch-free name and PEFT type), ``kind`` (the
:class:`~hydraopt.kinds.base.AdapterKind` implementation). The classic merges' ``merge_vera`` lives with
them in :mod:`hydraopt.merge.classic`.
"""
