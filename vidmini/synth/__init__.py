"""A seeded synthetic video world with exact ground truth, for training and evaluating video QA.

`world` holds the event timeline and per-second truth, `render` draws frames and writes mp4 files,
`questions` turns the truth into question/answer pairs whose answers are exact by construction.
"""
