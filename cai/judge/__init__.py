"""Measuring judges and runs: a judge against human labels (eval-judge), a run's statistics and its
report. Built on cai.generate (its stages judge, its run directories are read) and cai.core."""
