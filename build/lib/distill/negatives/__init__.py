"""Mined hard negatives (Leaner-and-Faster's L_HN): the negatives file, mining, refresh."""
