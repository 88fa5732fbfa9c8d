"""The CAM family as Captum layer attributions."""
