"""The `espc` command: main.py holds the app and the table of verbs, one module per verb or
group of verbs holds their code, common.py what they share."""
