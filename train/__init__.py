"""CIFAR-10 trainer for jaxdsc models: ``python -m train`` / ``jaxdsc-train`` (see train/README.md).

Modules: :mod:`train.config` (typed config, presets), :mod:`train.data`
(official-format readers, download), :mod:`train.feed` (device placement,
data order), :mod:`train.augment`, :mod:`train.model` (init / fine-tune
sources), :mod:`train.optim`, :mod:`train.steps` (jitted pure steps),
:mod:`train.checkpointing`, :mod:`train.loop`, :mod:`train.plots`,
:mod:`train.faults` (fault injection for tests), :mod:`train.malloc`
(allocator settings), :mod:`train.cli`.
"""
