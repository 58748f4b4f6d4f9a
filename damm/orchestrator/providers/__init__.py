"""Providers create and destroy gateway hosts behind one small interface (``base.Provider``)."""
