"""`mnv4-deploy report`: per target x precision accuracy, size and latency, roofline estimates, and the CI
regression gate (its command line is mnv4_deploy/cli/report.py).

Modules, one job each: grid (build or reuse every model x target x precision artifact through the pipeline;
shards and their merge), zoo (the models of a run), roofline (estimated latency on the paper's hardware),
schema (report.json), regression_gate (a new report against a committed baseline, paired tests),
sensitivity_section (the per-quantizer sensitivity a report keeps), markdown / page + svg (renderers).
"""
