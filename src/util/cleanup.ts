/**
 * Process-wide cleanup: temp files, child processes and VMs register here so that an error, a normal
 * exit or Ctrl-C leaves nothing behind. Handlers run last-registered-first.
 */

type Handler = () => void | Promise<void>;

const handlers = new Set<Handler>();

/** Register a cleanup handler; returns a function that unregisters it (call it when done normally). */
export function onCleanup(handler: Handler): () => void {
  handlers.add(handler);
  return () => {
    handlers.delete(handler);
  };
}

/** Run every registered handler once, newest first; errors in one handler do not stop the others. */
export async function runCleanup(): Promise<void> {
  const all = [...handlers].reverse();
  handlers.clear();
  for (const h of all) {
    try {
      await h();
    } catch {
      // Cleanup is best effort: a failing handler must not hide the original error.
    }
  }
}
