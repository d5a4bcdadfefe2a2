"""The callback's pipeline, in the order the data flows: capture -> accumulate -> compute -> report.

- :mod:`.config`: every option, validated once;
- :mod:`.capture` (binding to the classifier, hooks, shapes), :mod:`.probe` and :mod:`.first_step` (the
  checks of the first training step), :mod:`.labels` (labels, model inputs, which sample counts);
- :mod:`.accumulate`: one rank's sums over an epoch's training steps; :mod:`.exact`: the eval-mode pass;
- :mod:`.schedule`: which epochs are measured;
- :mod:`.compute`: finishing a measurement, the only place with collectives;
- :mod:`.run_state`: checkpointed state and per-fit state; :mod:`.diagnostics`: the warnings of a measurement.

Reporting to loggers lives in :mod:`lightning_neural_collapse.reporting`.
"""
