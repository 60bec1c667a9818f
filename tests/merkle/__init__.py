"""Tests of occlumfs.merkle: the image format, builder, reader, verifier and CLI."""
