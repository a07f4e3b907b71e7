"""Configuration the user writes: recipes, the typed option fields recipes and targets declare, named YAML
files (shipped or the user's own) and the safe YAML reader.

Config sits below every stage that reads it: no module here imports the targets (tests/test_imports.py checks,
lazy imports included). A recipe's `targets:` sections are kept as written until the target registry checks
them against each target's Options (mnv4_deploy.targets.check_recipe_targets).
"""
