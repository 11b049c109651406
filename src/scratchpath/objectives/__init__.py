"""Self-supervised objectives, one file each; ``OBJECTIVES`` maps the CLI name to the class."""
