"""The data engine: pipeline files and their inputs (constitution, prompts, importers), the streaming
runner, the run directory, exports, the stages and the backends they call, and the label arithmetic
the stages apply to a judge's answers (feedback, calibration). Imports only cai.core."""
