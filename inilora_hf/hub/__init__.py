"""The Hugging Face Hub (layer 2a): pushing and pulling repos, retries, and error translation."""
