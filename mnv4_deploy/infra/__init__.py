"""What every stage stands on: this program's own output (console), named and timed stages, atomic files and
folders, the output folder as one transaction, signals, schemas of the JSON files read back, converter
output kept off the terminal, and the export worker process."""
