"""The frontend: resolve discovered cards, preprocess from local_dir, route to engines."""
