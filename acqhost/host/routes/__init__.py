"""One module per message family: its fields, its stages and the answer it builds."""
