"""Judges that score generated text for concept presence and fluency (0-2 scales)."""
