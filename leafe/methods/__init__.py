"""The methods: each turns a starting model and its settings into a result (a model, trees, a
playbook, Pass@k), in its own directory, resumable. Import a method's module for its function."""
