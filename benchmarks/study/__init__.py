"""The init study: every IniLoRA-paper variant on real weights (all-MiniLM-L6-v2) and real data (Rotten Tomatoes)."""
