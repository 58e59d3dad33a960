"""The bottom layer: what every other package uses and that uses nothing else of cai's: errors, reading
user files safely and validating them, JSONL and atomic writes, seeding, registries, log redirection,
and where models come from."""
