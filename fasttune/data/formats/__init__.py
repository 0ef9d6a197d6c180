"""The chat formats fasttune ships: a table of per-role affixes plus the two reasoning formats written out."""
