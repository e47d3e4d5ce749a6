"""Running a job: device choice, config overrides, the output-folder lock, resume, pretrained weights
and the start-up error report. Imports nothing of methods, tracking, serving or the command line."""
