// Stands in for a bullmq Queue: records what would have been added.
export function fakeQueue(name = 'ai-jobs') {
  const added = [];
  const add = async (jobName, data, opts) => {
    added.push({ name: jobName, data, opts });
    return { id: opts.jobId, name: jobName, data, opts };
  };
  return { name, added, add };
}
