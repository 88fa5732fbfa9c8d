"""captum_ssl: CAM and attention explanations as Captum attributions."""

__version__ = "0.1.0"
