"""Speech beside the frames: the audio track's voice-activity segments and transcript, on the video's clock."""
