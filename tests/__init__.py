"""lmckit's tests (a package, so test modules import the shared helpers as ``tests.helpers``)."""
