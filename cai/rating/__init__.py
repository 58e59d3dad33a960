"""Rating policies (`cai eval`): models answer prompts, the constitution's judge compares their answers, and
Bradley-Terry ratings with intervals say which model is more harmless and which more helpful."""
