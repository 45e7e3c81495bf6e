"""Step 05: score the panels with the challenge's aesthetic predictor and measure style consistency.
Writes scores/; start with score.scoring.score_folder."""
