"""Stage 2, prepare: the float model made ready for every converter (eval mode, the export-friendly Mobile MQA).

(Named `preparation`, not `prepare`: `mnv4_deploy.prepare` is the public function, preparation.prepare.prepare.)
"""
