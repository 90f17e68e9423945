"""Camera frames to model inputs: decoding, preprocessing, and the preprocessing's operator norm."""
